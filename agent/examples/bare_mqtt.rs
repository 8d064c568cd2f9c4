//! Baseline for benchmarks: a bare tokio + rumqttc client, nothing else.
//!
//! `bare_mqtt idle HOST PORT`: connects and idles (for the idle RSS comparison).
//! `bare_mqtt publish HOST PORT N SIZE CLAIM_KEY`: enrolls as device `bench-bare` with the fleet
//! claim key file CLAIM_KEY (the coordinator refuses unauthenticated devices), then publishes N
//! QoS 1 v1 data envelopes (payload of SIZE bytes), each with its MAC trailer, so the coordinator
//! journals them exactly like agent traffic, and exits once every PUBACK is in, printing the
//! elapsed seconds. After enrolling it prints `ready` and waits for a line on stdin, so the
//! caller's clock covers publishing only. The MAC is the least
//! an accepted publisher must do, so the baseline does it too.

use std::time::{Duration, Instant};

use protocol::v1::auth::{Identity, SessionKeys, Stamp};
use protocol::v1::enroll::{self, Decision, EnrollRequest, Hardware};
use protocol::v1::{VERSION, topics};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};

/// Enrolls `bench-bare` with a fresh identity and the claim; returns the session keys.
async fn enroll(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    claim: &protocol::v1::deploy::SigningKey,
) -> anyhow::Result<SessionKeys> {
    let device = "bench-bare";
    let id = Identity::generate();
    client
        .subscribe(topics::enroll_answer(device), QoS::AtLeastOnce)
        .await?;
    let request = EnrollRequest {
        v: VERSION,
        device: device.into(),
        identity: id.public(),
        hardware: Hardware {
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            board: String::new(),
            accelerators: vec![],
            agent_version: "bare".into(),
        },
        claim_key: Some(protocol::v1::deploy::public_key_hex(&claim.verifying_key())),
        issued_ms: protocol::v1::now_ms(),
    };
    client
        .publish(
            topics::enroll(device),
            QoS::AtLeastOnce,
            false,
            enroll::seal_request(&request, &id, Some(claim)),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Incoming::Publish(p)))) =
            tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await
        {
            let answer = enroll::open_answer(device, &p.payload, &id.public(), None)?;
            anyhow::ensure!(
                answer.decision == Decision::Accepted,
                "enrollment {}: {}",
                answer.decision.as_str(),
                answer.reason
            );
            let keys = id.session_keys(
                &answer.coordinator,
                device,
                &id.public(),
                &answer.coordinator,
            )?;
            return Ok(keys);
        }
    }
    anyhow::bail!("no enrollment answer within 30 s")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, host, port) = match args.as_slice() {
        [_, m, h, p, ..] => (m.clone(), h.clone(), p.parse::<u16>()?),
        _ => anyhow::bail!("usage: bare_mqtt idle|publish HOST PORT [N SIZE]"),
    };
    let mut opts = MqttOptions::new(format!("bare-{}", std::process::id()), host, port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(64)
        .set_max_packet_size(131_072, 131_072);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    match mode.as_str() {
        "idle" => loop {
            eventloop.poll().await?;
        },
        "publish" => {
            let n: usize = args
                .get(4)
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(10_000);
            let size: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(200);
            let claim = args
                .get(6)
                .ok_or_else(|| anyhow::anyhow!("publish needs the claim key file"))?;
            let claim = protocol::keyfile::load_signing_key(std::path::Path::new(claim))?;
            let session = enroll(&client, &mut eventloop, &claim).await?;
            // Enrolled: say so and wait for the go (a line on stdin), so the caller's clock
            // covers publishing only. The event loop keeps the connection alive meanwhile.
            println!("ready");
            let mut go = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)
            });
            loop {
                tokio::select! {
                    r = &mut go => { r??; break; }
                    ev = eventloop.poll() => { ev?; }
                }
            }
            let filler = "x".repeat(size);
            let start = Instant::now();
            let run = std::process::id();
            let topic = "edge/v1/bench-bare/data/bench";
            let publisher = tokio::spawn(async move {
                for i in 0..n {
                    let payload = format!(
                        r#"{{"v":1,"id":"{run:016x}{i:016x}","device":"bench-bare","class":"results","seq":{i},"created_ms":0,"body":{{"stream":"bench","payload":"{filler}"}}}}"#
                    );
                    let stamp = Stamp {
                        epoch: 1,
                        counter: i as u64 + 1,
                    };
                    let sealed = session.up.seal(topic, payload.as_bytes(), stamp);
                    client
                        .publish(topic, QoS::AtLeastOnce, false, sealed)
                        .await?;
                }
                anyhow::Ok(client)
            });
            let mut acks = 0;
            while acks < n {
                if let Event::Incoming(Incoming::PubAck(_)) = eventloop.poll().await? {
                    acks += 1;
                }
            }
            let _client = publisher.await??;
            println!("{:.6}", start.elapsed().as_secs_f64());
            Ok(())
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
}
