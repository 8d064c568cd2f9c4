//! `edge-attacker`: a hostile MQTT client for the security tests. A separate process on the same
//! broker as the real agents and coordinator, holding nothing but what an attacker on the network
//! has: the topic tree, the wire formats, whatever it captured, and (for the stolen-image case) a
//! fleet claim key. Each attack prints one JSON line: what it sent and what the broker acked.
//!
//! ```text
//! edge-attacker PORT impersonate DEVICE          every device topic of DEVICE, unsealed and with a forged MAC
//! edge-attacker PORT enroll-as DEVICE [CLAIM]    enroll an existing id under a new key (optionally claimed)
//! edge-attacker PORT sybil N                     N enrollment requests for new ids, no claim
//! edge-attacker PORT forge-status DEVICE ID VER  deploy status `healthy` for deployment ID version VER
//! edge-attacker PORT forge-chunk DEVICE N        N chunks of random bytes on DEVICE's chunk topic
//! edge-attacker PORT forge-update DEVICE N       N FL updates that are not DEVICE's
//! edge-attacker PORT forge-offload DEVICE        a forged offload response and an unsigned capacity advert
//! edge-attacker PORT capture FILTER FILE         save the first message on FILTER (retained counts)
//! edge-attacker PORT replay FILE                 publish a captured message again, as it was
//! edge-attacker PORT flood DEVICE N              N unauthenticated data messages, pipelined
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use edge_tests::{RawMqtt, RawOutcome};
use protocol::v1::auth::{Identity, MAC_TRAILER_LEN, MAGIC};
use protocol::v1::binary::BinaryEnvelope;
use protocol::v1::enroll::{EnrollRequest, Hardware, seal_request};
use protocol::v1::{Class, VERSION, topics};
use rand::RngCore;

const WAIT: Duration = Duration::from_secs(30);

fn main() {
    match run(std::env::args().skip(1).collect()) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("edge-attacker: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Vec<String>) -> Result<serde_json::Value> {
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument {i}; see the file's docs for usage"))
    };
    let port: u16 = arg(0)?.parse().context("PORT")?;
    let attack = arg(1)?;
    let mut mqtt = RawMqtt::connect(port, &format!("attacker-{}", std::process::id()), WAIT)?;
    let mut sent = 0usize;
    let mut acked = 0usize;
    let mut send = |m: &mut RawMqtt, topic: &str, payload: Vec<u8>, retain: bool| -> Result<()> {
        sent += 1;
        if m.publish_with(topic, payload, retain, WAIT)? == RawOutcome::Acked {
            acked += 1;
        }
        Ok(())
    };
    match attack {
        "impersonate" => {
            let d = arg(2)?;
            for (topic, payload) in device_messages(d) {
                send(&mut mqtt, &topic, payload.clone(), false)?;
                send(&mut mqtt, &topic, forged_mac(payload), false)?;
            }
        }
        "enroll-as" => {
            let d = arg(2)?;
            let claim = match args.get(3) {
                Some(path) => Some(protocol::keyfile::load_signing_key(std::path::Path::new(
                    path,
                ))?),
                None => None,
            };
            let thief = Identity::generate();
            let req = request(d, &thief, claim.as_ref());
            send(
                &mut mqtt,
                &topics::enroll(d),
                seal_request(&req, &thief, claim.as_ref()),
                false,
            )?;
        }
        "sybil" => {
            let n: usize = arg(2)?.parse().context("N")?;
            for i in 0..n {
                let d = format!("sybil-{i}");
                let id = Identity::generate();
                send(
                    &mut mqtt,
                    &topics::enroll(&d),
                    seal_request(&request(&d, &id, None), &id, None),
                    false,
                )?;
                // And what a Sybil would then send.
                send(
                    &mut mqtt,
                    &topics::telemetry(&d),
                    forged_mac(envelope(&d, serde_json::json!({}))),
                    false,
                )?;
            }
        }
        "forge-status" => {
            let (d, id, ver) = (arg(2)?, arg(3)?, arg(4)?);
            let body = serde_json::json!({
                "deployment_id": id, "version": ver.parse::<u64>().context("VER")?,
                "step": {"state": "healthy"}
            });
            let payload = envelope(d, body);
            send(&mut mqtt, &topics::deploy_status(d), payload.clone(), false)?;
            send(
                &mut mqtt,
                &topics::deploy_status(d),
                forged_mac(payload),
                false,
            )?;
        }
        "forge-chunk" => {
            let d = arg(2)?;
            let n: usize = arg(3)?.parse().context("N")?;
            for i in 0..n {
                let mut body = vec![0u8; 4096];
                rand::thread_rng().fill_bytes(&mut body);
                let env = BinaryEnvelope {
                    id: format!("forged{i}"),
                    device: topics::COORDINATOR.into(),
                    class: Class::Model,
                    seq: i as u64,
                    created_ms: protocol::v1::now_ms(),
                    kind: "chunk".into(),
                    body,
                };
                send(&mut mqtt, &topics::deploy_chunk(d), env.encode()?, false)?;
            }
        }
        "forge-update" => {
            let d = arg(2)?;
            let n: usize = arg(3)?.parse().context("N")?;
            for i in 0..n {
                let mut body = vec![0u8; 2048];
                rand::thread_rng().fill_bytes(&mut body);
                let env = BinaryEnvelope {
                    id: format!("forgedupdate{i}"),
                    device: d.into(),
                    class: Class::Model,
                    seq: i as u64,
                    created_ms: protocol::v1::now_ms(),
                    kind: "fl-update".into(),
                    body,
                };
                let payload = env.encode()?;
                send(&mut mqtt, &topics::fl_update(d), payload.clone(), false)?;
                send(&mut mqtt, &topics::fl_update(d), forged_mac(payload), false)?;
            }
        }
        "forge-offload" => {
            let d = arg(2)?;
            let response =
                serde_json::json!({"v": VERSION, "id": "forged", "outputs": []}).to_string();
            send(
                &mut mqtt,
                &topics::offload_response(d),
                forged_mac(response.into_bytes()),
                false,
            )?;
            let advert = serde_json::json!({
                "v": VERSION, "replica": "evil", "workers": 64, "queue": 0, "max_queue": 1000,
                "models": ["*"], "issued_ms": protocol::v1::now_ms()
            })
            .to_string();
            send(
                &mut mqtt,
                &topics::offload_capacity("evil"),
                advert.into_bytes(),
                true,
            )?;
        }
        "capture" => {
            let (filter, file) = (arg(2)?, arg(3)?);
            let (topic, payload, retain) = mqtt.first_message(filter, Duration::from_secs(180))?;
            let saved =
                serde_json::json!({"topic": topic, "retain": retain, "payload": hex(&payload)});
            std::fs::write(file, saved.to_string())
                .with_context(|| format!("cannot write {file}"))?;
            return Ok(
                serde_json::json!({"attack": attack, "topic": topic, "bytes": payload.len()}),
            );
        }
        "replay" => {
            let file = arg(2)?;
            let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(file)?)?;
            let topic = saved["topic"].as_str().context("topic")?;
            let payload = unhex(saved["payload"].as_str().context("payload")?)?;
            // Retained messages are replayed as retained: the broker then hands the old one to
            // every later subscriber, including the device after a restart.
            send(
                &mut mqtt,
                topic,
                payload,
                saved["retain"].as_bool().unwrap_or(false),
            )?;
        }
        "flood" => {
            let d = arg(2)?;
            let n: usize = arg(3)?.parse().context("N")?;
            let msgs = (0..n)
                .map(|i| {
                    let body = serde_json::json!({"stream": "flood", "payload": {"i": i}});
                    (
                        topics::data(d, "flood"),
                        envelope_with_id(d, &format!("flood{i}"), body),
                    )
                })
                .collect();
            sent = n;
            acked = mqtt.flood(msgs, Duration::from_secs(300))?;
        }
        other => bail!("unknown attack {other:?}"),
    }
    Ok(serde_json::json!({"attack": attack, "sent": sent, "acked": acked}))
}

fn request(
    device: &str,
    id: &Identity,
    claim: Option<&protocol::v1::deploy::SigningKey>,
) -> EnrollRequest {
    EnrollRequest {
        v: VERSION,
        device: device.into(),
        identity: id.public(),
        hardware: Hardware {
            arch: "x86_64".into(),
            os: "linux".into(),
            board: "attacker".into(),
            accelerators: vec![],
            agent_version: "0.0.0".into(),
        },
        claim_key: claim.map(|k| protocol::v1::deploy::public_key_hex(&k.verifying_key())),
        issued_ms: protocol::v1::now_ms(),
    }
}

/// A well-formed JSON envelope from `device`: everything the old check (envelope device = topic
/// device) wanted, which the attacker can write.
fn envelope(device: &str, body: serde_json::Value) -> Vec<u8> {
    let mut id = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut id);
    envelope_with_id(device, &hex(&id), body)
}

fn envelope_with_id(device: &str, id: &str, body: serde_json::Value) -> Vec<u8> {
    serde_json::json!({
        "v": VERSION, "id": id, "device": device, "class": "results", "seq": 1,
        "created_ms": protocol::v1::now_ms(), "body": body
    })
    .to_string()
    .into_bytes()
}

/// `payload` with a MAC trailer of the right shape and a made-up tag and stamp.
fn forged_mac(mut payload: Vec<u8>) -> Vec<u8> {
    let mut t = vec![0u8; MAC_TRAILER_LEN - 3];
    rand::thread_rng().fill_bytes(&mut t);
    payload.extend_from_slice(&t);
    payload.push(1);
    payload.extend_from_slice(MAGIC);
    payload
}

/// One message for every topic a device sends on.
fn device_messages(d: &str) -> Vec<(String, Vec<u8>)> {
    let status = serde_json::json!({
        "v": VERSION, "device": d, "online": false, "since_ms": u64::MAX, "agent_version": "evil"
    });
    let update = BinaryEnvelope {
        id: "forgedfl".into(),
        device: d.into(),
        class: Class::Model,
        seq: 1,
        created_ms: protocol::v1::now_ms(),
        kind: "fl-update".into(),
        body: vec![1, 2, 3],
    };
    vec![
        (topics::status(d), status.to_string().into_bytes()),
        (
            topics::register(d),
            envelope(
                d,
                serde_json::json!({
                    "agent_version": "evil", "hostname": "evil", "os": "linux", "arch": "x86_64",
                    "boot_id": "evil", "started_ms": 1, "capabilities": [], "groups": ["admin"]
                }),
            ),
        ),
        (
            topics::telemetry(d),
            envelope(d, serde_json::json!({"cpu_percent": 99.0})),
        ),
        (
            topics::data(d, "forged"),
            envelope(
                d,
                serde_json::json!({"stream": "forged", "payload": {"forged": true}}),
            ),
        ),
        (
            topics::deploy_status(d),
            envelope(
                d,
                serde_json::json!({"deployment_id": "x", "version": 1, "step": {"state": "healthy"}}),
            ),
        ),
        (
            topics::deploy_resend(d),
            envelope(
                d,
                serde_json::json!({"deployment_id": "x", "version": 1, "missing": []}),
            ),
        ),
        (topics::fl_update(d), update.encode().unwrap_or_default()),
        (
            topics::offload_request(d),
            serde_json::json!({"v": VERSION, "id": "forged", "model": "m", "inputs": []})
                .to_string()
                .into_bytes(),
        ),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).context("odd hex")?, 16).context("hex"))
        .collect()
}
