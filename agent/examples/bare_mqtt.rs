//! Baseline for benchmarks: a bare tokio + rumqttc client, nothing else.
//!
//! `bare_mqtt idle HOST PORT`: connects and idles (for the idle RSS comparison).
//! `bare_mqtt publish HOST PORT N SIZE`: publishes N QoS 1 v1 data envelopes (payload of SIZE
//! bytes) as device `bench-bare`, so the coordinator journals them exactly like agent traffic,
//! and exits once every PUBACK is in, printing the elapsed seconds.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

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
            let filler = "x".repeat(size);
            let start = Instant::now();
            let run = std::process::id();
            let publisher = tokio::spawn(async move {
                for i in 0..n {
                    let payload = format!(
                        r#"{{"v":1,"id":"{run:016x}{i:016x}","device":"bench-bare","class":"results","seq":{i},"created_ms":0,"body":{{"stream":"bench","payload":"{filler}"}}}}"#
                    );
                    client
                        .publish(
                            "edge/v1/bench-bare/data/bench",
                            QoS::AtLeastOnce,
                            false,
                            payload,
                        )
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
