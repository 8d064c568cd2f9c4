//! Offload decisions end to end: the real coordinator (embedded broker) with its inference
//! service, and a real agent behind a [`LinkProxy`] running a pipeline whose inference stage
//! may offload. The agent decides by cost (energy, with a deadline), and its decisions follow
//! the link: offload while the link is fast, local once it turns slow (the deadline), local
//! while it is cut (offline), and offload again once it recovers (noticed by link probes).
//! Every decision is counted with its reason in telemetry, and no frame fails on the way.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_testmodels::onnx_builder;
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, Link, LinkProxy, OFFLOAD_PIPELINE, TestEnv,
    latest_offload, offload_coordinator_config, offload_count, offloading_agent, run_test,
};

const DEVICE: &str = "off-1";
const WAIT: Duration = Duration::from_secs(90);
/// Reconnects of the agent the proxy refuses before a cut ends.
const REFUSED_PER_CUT: u64 = 8;
/// Cuts before the test gives up on seeing 20 offline decisions.
const MAX_CUTS: u32 = 10;

fn count(events: &[Event], key: &str) -> u64 {
    offload_count(events, DEVICE, key)
}

/// Calls and errors of the inference stage in the latest pipeline telemetry.
fn stage_calls(events: &[Event]) -> Option<(u64, u64)> {
    let stage = events
        .iter()
        .rev()
        .filter(|e| e.is_for("telemetry", DEVICE))
        .find_map(|e| e.raw.get("pipeline"))?
        .get("stages")?
        .as_array()?
        .iter()
        .find(|n| n.get("name").and_then(|v| v.as_str()) == Some("classify"))?;
    Some((stage.get("ok")?.as_u64()?, stage.get("errors")?.as_u64()?))
}

/// True once the journal from `from` on holds the device's reconnect (`online`) and telemetry
/// the agent sampled after it (so after the decisions it made while cut off).
fn reported_after_reconnect(events: &[Event], from: usize) -> bool {
    let after = events.get(from..).unwrap_or_default();
    let Some(since) = after
        .iter()
        .find(|e| e.is_for("online", DEVICE))
        .and_then(|e| e.raw.get("since_ms")?.as_u64())
    else {
        return false;
    };
    after.iter().any(|e| {
        e.is_for("telemetry", DEVICE)
            && e.raw
                .get("created_ms")
                .and_then(|v| v.as_u64())
                .is_some_and(|created| created >= since)
    })
}

#[test]
fn decisions_follow_the_link() {
    run_test("offload_decisions", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let dir = env.path("files");
    std::fs::create_dir_all(dir.join("models"))?;
    let model_path = dir.join("models/mlp.onnx");
    std::fs::write(
        &model_path,
        onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1)),
    )?;
    let config = dir.join("coordinator.toml");
    std::fs::write(&config, offload_coordinator_config(&model_path))?;
    let coord = Coordinator::start_embedded_with_args(
        &env.path("coordinator"),
        vec!["--config".into(), config.display().to_string()],
    )?;
    let mut journal = coord.journal();
    let proxy = LinkProxy::to_port(coord.port().context("coordinator port")?)?;

    let pipeline = dir.join("pipeline.toml");
    std::fs::write(&pipeline, OFFLOAD_PIPELINE)?;
    let mut o = AgentOptions::new(DEVICE, proxy.url());
    o.telemetry_interval_s = 1;
    o.reconnect_max_ms = 500;
    offloading_agent(&mut o, &pipeline)?;
    let agent = Agent::start(&env.path(DEVICE), o)?;
    journal.wait_registered(DEVICE, WAIT)?;

    // Fast link: the coordinator answers well within the deadline and saves the CPU's energy.
    journal.wait_for("offloaded frames on the fast link", WAIT, |j| {
        count(j, "decisions.offload/cost") >= 20 && count(j, "remote_ok") >= 20
    })?;

    // Slow link: 250 ms each way misses the 150 ms deadline, so frames stay on the device.
    let before = count(journal.events(), "decisions.local/deadline");
    proxy.set(Link {
        delay: Duration::from_millis(250),
        ..Link::default()
    });
    journal.wait_for("local decisions on the slow link", WAIT, |j| {
        count(j, "decisions.local/deadline") >= before + 20
    })?;

    // Cut: the agent is offline and runs everything locally; the counts arrive with the
    // telemetry kept in its outbox once the link is back. So the link stays cut until the
    // agent has noticed (a few of its reconnects were refused, at least reconnect_min_ms
    // apart, with frames running offline meanwhile), then comes back until telemetry sampled
    // after the reconnect is in; should it show fewer than 20 offline decisions, it is cut
    // again.
    let offline_before = count(journal.events(), "decisions.local/offline");
    for cut in 1.. {
        let refused = proxy.stats().refused;
        proxy.cut();
        proxy.wait_stats("the agent's reconnects refused while cut", WAIT, |s| {
            s.refused >= refused + REFUSED_PER_CUT
        })?;
        let from = journal.len();
        proxy.set(Link::default());
        proxy.restore();
        journal.wait_for("telemetry sampled after the reconnect", WAIT, |j| {
            reported_after_reconnect(j, from)
        })?;
        if count(journal.events(), "decisions.local/offline") >= offline_before + 20 {
            break;
        }
        ensure!(
            cut < MAX_CUTS,
            "fewer than 20 offline decisions after {cut} cuts: {:?}",
            latest_offload(journal.events(), DEVICE)
        );
    }
    let offload_before = count(journal.events(), "decisions.offload/cost");

    // Back to fast: probes see the link recover and frames go to the coordinator again.
    journal.wait_for(
        "offline decisions reported and offloading again",
        WAIT,
        |j| {
            count(j, "decisions.local/offline") >= offline_before + 20
                && count(j, "decisions.offload/cost") >= offload_before + 20
        },
    )?;

    let events = journal.events();
    let t = latest_offload(events, DEVICE).context("offload telemetry")?;
    ensure!(count(events, "probes") >= 1, "no link probe was sent: {t}");
    // Every frame got an answer from one side or the other.
    let (ok, errors) = stage_calls(events).context("stage telemetry")?;
    ensure!(
        ok > 0 && errors == 0,
        "inference stage: {ok} ok, {errors} errors"
    );
    eprintln!("offload telemetry at the end: {t}");
    drop(agent);
    Ok(())
}
