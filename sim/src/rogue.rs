//! Rogue clients: the scenario's `[[rogue]]` attacks, each run with `edge-attacker` (the
//! security tests' hostile client, `tests/src/bin/edge-attacker.rs`) against the scenario's
//! broker at its time. What the attacker printed (what it sent, what the broker acked) goes
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
    let setup = broker_port(&s).and_then(|port| Ok((port, attacker_bin()?)));
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
        let out = tokio::process::Command::new(&bin)
            .arg(port.to_string())
            .args(&r.attack)
            .kill_on_drop(true)
            .output()
            .await;
        let what = r.attack.join(" ");
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
