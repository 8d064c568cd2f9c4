//! Rogue clients: the scenario's `[[rogue]]` attacks at their times against the scenario's
//! broker. `replay DEVICE` runs here: a plain MQTT client (no fleet keys) records one of the
//! device's sealed messages off the broker and publishes it again unchanged, which the
//! coordinator must drop as a replay (`auth_rejected` with reason `replay` in its journal).
//! Every other attack runs `edge-attacker` (the security tests' hostile client,
//! `tests/src/bin/edge-attacker.rs`). What the attacker printed (what it sent, what the broker acked) goes
//! into the timeline; what the coordinator made of it is in its journal (`auth_rejected`, ...).
//!
//! **Boundary:** the attacker binary is found beside `edge-sim` (same build) or through
//! `EDGE_ATTACKER_BIN`; it speaks plain MQTT to `127.0.0.1:PORT`, so rogues need a broker on
//! loopback without TLS.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::scenario::{Rogue, Scenario};
use crate::timeline::Timeline;

fn attacker_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EDGE_ATTACKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let p = exe.with_file_name("edge-attacker");
    if !p.is_file() {
        bail!(
            "edge-attacker not found beside {} (cargo build -p edge-tests --bins) and EDGE_ATTACKER_BIN unset",
            exe.display()
        );
    }
    Ok(p)
}

/// The broker's port from the devices' MQTT url (`mqtt://127.0.0.1:PORT`).
fn broker_port(s: &Scenario) -> Result<u16> {
    let url = s
        .agent
        .get("mqtt")
        .and_then(|m| m.get("url"))
        .and_then(|u| u.as_str())
        .context("[agent.mqtt] url is not set")?;
    let rest = url
        .strip_prefix("mqtt://")
        .with_context(|| format!("rogues need a plain mqtt:// broker, not {url}"))?;
    let port = rest.rsplit(':').next().unwrap_or("1883");
    port.parse()
        .with_context(|| format!("no port in the broker url {url}"))
}

/// Runs every rogue at its time; returns when all have run.
pub async fn run_all(s: Scenario, timeline: Timeline) {
    if s.rogue.is_empty() {
        return;
    }
    let needs_attacker = s.rogue.iter().any(|r| r.attack[0] != "replay");
    let setup = broker_port(&s).and_then(|port| {
        Ok((
            port,
            if needs_attacker {
                Some(attacker_bin()?)
            } else {
                None
            },
        ))
    });
    let (port, bin) = match setup {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "rogue devices not run");
            timeline.record("rogue", "rogue-failed", &format!("{e:#}"));
            return;
        }
    };
    let mut rogues: Vec<Rogue> = s.rogue.clone();
    rogues.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let start = tokio::time::Instant::now();
    for r in rogues {
        tokio::time::sleep_until(start + Duration::from_secs_f64(r.at_s.max(0.0))).await;
        let what = r.attack.join(" ");
        if r.attack[0] == "replay" {
            match replay(port, &r.attack[1]).await {
                Ok(said) => {
                    tracing::info!(attack = %what, result = %said, "rogue client ran");
                    timeline.record("rogue", "rogue", &format!("{what}: {said}"));
                }
                Err(e) => {
                    tracing::warn!(attack = %what, error = %format!("{e:#}"), "rogue client failed");
                    timeline.record("rogue", "rogue-failed", &format!("{what}: {e:#}"));
                }
            }
            continue;
        }
        let Some(bin) = &bin else { continue };
        let out = tokio::process::Command::new(bin)
            .arg(port.to_string())
            .args(&r.attack)
            .kill_on_drop(true)
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {
                let said = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                tracing::info!(attack = %what, result = %said, "rogue client ran");
                timeline.record("rogue", "rogue", &format!("{what}: {said}"));
            }
            Ok(o) => {
                let said = String::from_utf8_lossy(&o.stderr).trim().to_owned();
                tracing::warn!(attack = %what, error = %said, "rogue client failed");
                timeline.record("rogue", "rogue-failed", &format!("{what}: {said}"));
            }
            Err(e) => {
                timeline.record("rogue", "rogue-failed", &format!("{what}: {e}"));
            }
        }
    }
}

/// How long a replay waits for the device to send something it can record.
const REPLAY_WAIT: Duration = Duration::from_secs(120);

/// Records one sealed message `device` sends (its telemetry or registration) and publishes it
/// again, byte for byte, on the same topic. Returns what it replayed.
async fn replay(port: u16, device: &str) -> Result<String> {
    use protocol::v1::topics;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let id = format!("edge-sim-replay-{:08x}", rand::random::<u32>());
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (client, mut events) = AsyncClient::new(opts, 16);
    let watched = [topics::telemetry(device), topics::register(device)];
    for t in &watched {
        client
            .subscribe(t.as_str(), QoS::AtLeastOnce)
            .await
            .with_context(|| format!("cannot subscribe to {t}"))?;
    }
    let recorded = tokio::time::timeout(REPLAY_WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if watched.contains(&p.topic) => {
                    return Ok::<_, anyhow::Error>(p);
                }
                Ok(_) => {}
                Err(e) => bail!("broker connection: {e}"),
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "{device} sent nothing on {} within {} s",
            watched.join(" or "),
            REPLAY_WAIT.as_secs()
        )
    })??;
    client
        .publish(
            recorded.topic.as_str(),
            QoS::AtLeastOnce,
            false,
            recorded.payload.to_vec(),
        )
        .await
        .context("cannot publish the recorded message")?;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("broker connection: {e}"),
            }
        }
    })
    .await
    .context("the broker did not acknowledge the replayed message")??;
    let _ = client.disconnect().await;
    Ok(format!(
        "replayed a recorded message on {} ({} bytes), broker acked",
        recorded.topic,
        recorded.payload.len()
    ))
}
