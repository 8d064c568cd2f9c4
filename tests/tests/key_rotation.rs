//! Rotation of the coordinator's online key while the fleet works: a coordinator and two
//! enrolled agents (one pinning the coordinator key in its config, one trusting it on first
//! use) publish readings; `identity rotate` runs beside `serve`; every reading arrives once
//! (before, during and after the rotation, and after an agent restart), both agents switch to
//! the new key (journal: `device_key_switched`, then the automatic
//! `coordinator_key_rotation_finished`), and afterwards a message MAC'd with the old key's
//! session keys, or an answer signed with the old key, is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use edge_tests::enroll::coordinator_identity;
use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, Expected, RawMqtt, TestEnv, coordinator_bin, run_test,
    test_messages,
};
use protocol::v1::auth::{Identity, PublicIdentity, Stamp};
use protocol::v1::enroll::{Decision, EnrollAnswer, seal_answer};
use protocol::v1::{Data, Envelope, topics};

const WAIT: Duration = Duration::from_secs(60);
const DEVICES: [&str; 2] = ["rot-pinned", "rot-tofu"];
const N: usize = 20;
const CLASSES: [Class; 2] = [Class::Results, Class::Telemetry];

#[test]
fn the_coordinator_key_rotates_while_the_fleet_publishes() {
    run_test("key_rotation", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord_dir = env.path("coordinator");
    let state = coord_dir.join("state");
    std::fs::create_dir_all(&state)?;
    let old_public = coordinator_identity(&state)?;
    let coord = Coordinator::start_embedded(&coord_dir)?;
    ensure!(
        coord.state_dir() == state,
        "the harness's coordinator state dir moved: {}",
        coord.state_dir().display()
    );
    // What an attacker who stole the old key after the rotation would hold.
    let stolen = env.path("stolen-coordinator.key");
    std::fs::copy(state.join("coordinator.key"), &stolen)?;
    std::fs::set_permissions(&stolen, std::fs::Permissions::from_mode(0o600))?;
    let old = protocol::keyfile::load_identity(&stolen)?;
    ensure!(
        old.public() == old_public,
        "the copied key is the coordinator's"
    );

    let mut pinned_opts = AgentOptions::new(DEVICES[0], coord.url());
    pinned_opts.coordinator_key = Some(old_public.clone());
    let mut agents = [
        Agent::start(&env.path(DEVICES[0]), pinned_opts)?,
        Agent::start(
            &env.path(DEVICES[1]),
            AgentOptions::new(DEVICES[1], coord.url()),
        )?,
    ];
    let mut journal = coord.journal();
    for d in DEVICES {
        journal.wait_registered(d, WAIT)?;
    }
    let mut expected: [Vec<Expected>; 2] = [Vec::new(), Vec::new()];
    publish(&agents, &mut expected, "before")?;

    // Rotate while serve runs (through the spool, as an operator would).
    let from = journal.events().len();
    let out = Command::new(coordinator_bin()?)
        .args(["identity", "rotate", "--state-dir"])
        .arg(&state)
        .output()
        .context("cannot run edge-coordinator identity rotate")?;
    ensure!(
        out.status.success(),
        "identity rotate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = journal.wait_for_event("coordinator_key_rotated", from, WAIT, |e| {
        e.is("coordinator_key_rotated")
    })?;
    let new_key_id = rotated.raw["new_key_id"]
        .as_str()
        .context("new_key_id")?
        .to_owned();
    ensure!(rotated.raw["old_key_id"] == old_public.key_id().as_str());
    ensure!(rotated.raw["devices_told"] == 2, "{}", rotated.raw);
    ensure!(new_key_id != old_public.key_id());
    // Readings published right away (some sealed before the agents heard of it).
    publish(&agents, &mut expected, "during")?;

    for d in DEVICES {
        journal.wait_for_event(&format!("device_key_switched for {d}"), from, WAIT, |e| {
            e.is_for("device_key_switched", d)
        })?;
    }
    let finished =
        journal.wait_for_event("coordinator_key_rotation_finished", from, WAIT, |e| {
            e.is("coordinator_key_rotation_finished")
        })?;
    ensure!(finished.raw["automatic"] == true, "{}", finished.raw);
    ensure!(finished.raw["switched"] == 2, "{}", finished.raw);
    ensure!(
        !state.join("coordinator.key.old").exists(),
        "the old key file is deleted"
    );
    let new_public = coordinator_identity(&state)?;
    ensure!(new_public.key_id() == new_key_id);
    for a in &agents {
        wait_log(a, "coordinator key rotated")?;
    }
    // The pinned agent warns that its config pin is stale.
    wait_log(&agents[0], "enrollment.coordinator is stale")?;
    publish(&agents, &mut expected, "after")?;

    // A restart: the pinned agent trusts the new key from its rotation file, not its config.
    agents[0].stop()?;
    agents[0].restart()?;
    wait_log(
        &agents[0],
        "trusting the coordinator key a rotation announced",
    )?;
    publish(&agents, &mut expected, "restarted")?;
    for (i, d) in DEVICES.iter().enumerate() {
        journal.expect_delivered(d, &expected[i])?;
    }

    // After finish, the old key is worth nothing: a reading MAC'd with the old session keys
    // is dropped at the coordinator, and a revocation signed with it is ignored by the device.
    let device_public = enrolled_identity(&state, DEVICES[1])?;
    forge_reading(&coord, &old, &device_public, DEVICES[1])?;
    forge_revocation(&coord, &old, &device_public, DEVICES[1])?;
    journal.wait_for_event("auth_rejected naming the forged reading", from, WAIT, |e| {
        e.is("auth_rejected")
            && e.raw["reasons"]["bad_mac"].as_u64().unwrap_or(0) >= 1
            && e.raw["devices"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == DEVICES[1]))
    })?;
    ensure!(
        !journal
            .data_counts(DEVICES[1])
            .contains_key("forged-old-key"),
        "the forged reading was journaled as data"
    );
    publish(&agents, &mut expected, "forged")?;
    for (i, d) in DEVICES.iter().enumerate() {
        journal.expect_delivered(d, &expected[i])?;
    }
    wait_log(
        &agents[1],
        "dropping an enrollment answer that does not verify",
    )?;
    ensure!(!agents[1].log().contains("enrollment revoked"));
    Ok(())
}

/// Waits until the agent's log has a line containing `needle` (the log is the agent's own
/// record of the event; there is no other channel for it).
fn wait_log(agent: &Agent, needle: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    while !agent.log().contains(needle) {
        if std::time::Instant::now() >= deadline {
            bail!(
                "{}: no log line with {needle:?} within {WAIT:?}",
                agent.device_id()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `N` readings from each agent; what was accepted goes to `expected`.
fn publish(agents: &[Agent; 2], expected: &mut [Vec<Expected>; 2], tag: &str) -> Result<()> {
    for (i, a) in agents.iter().enumerate() {
        let msgs = test_messages(&format!("{tag}-{i}"), N, &CLASSES);
        expected[i].extend(a.api()?.publish_all(&msgs, 10)?);
    }
    Ok(())
}

/// The device's public identity from the coordinator's enrollment snapshot.
fn enrolled_identity(state: &Path, device: &str) -> Result<PublicIdentity> {
    let path = state.join("enrollment").join("devices.json");
    let records: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&path)?)?;
    let record = records
        .into_iter()
        .find(|r| r["device"] == device)
        .with_context(|| format!("{device} not in {}", path.display()))?;
    Ok(serde_json::from_value(record["identity"].clone())?)
}

fn raw(coord: &Coordinator, name: &str) -> Result<RawMqtt> {
    let port = coord.port().context("embedded broker port")?;
    RawMqtt::connect(port, name, WAIT)
}

/// A reading for `device` MAC'd with the session keys of the old coordinator key (which the
/// old key's holder can derive from the device's public identity).
fn forge_reading(
    coord: &Coordinator,
    old: &Identity,
    device_public: &PublicIdentity,
    device: &str,
) -> Result<()> {
    let keys = old
        .session_keys(device_public, device, device_public, &old.public())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let topic = topics::data(device, "forged");
    let body = Envelope {
        v: protocol::v1::VERSION,
        id: "forged-old-key".into(),
        device: device.into(),
        class: Class::Results,
        seq: u64::MAX / 2,
        prev: None,
        created_ms: protocol::v1::now_ms(),
        body: Data {
            stream: "forged".into(),
            payload: serde_json::json!({"forged": true}).into(),
        },
    }
    .to_json();
    let sealed = keys.up.seal(
        &topic,
        &body,
        Stamp {
            epoch: u64::MAX / 2,
            counter: 1,
        },
    );
    let mut client = raw(coord, "rot-forger-1")?;
    client.publish(&topic, sealed, WAIT)?;
    Ok(())
}

/// A revocation of `device`, signed with the old coordinator key, newer than anything held.
fn forge_revocation(
    coord: &Coordinator,
    old: &Identity,
    device_public: &PublicIdentity,
    device: &str,
) -> Result<()> {
    let answer = EnrollAnswer {
        v: protocol::v1::VERSION,
        device: device.into(),
        device_key: device_public.sign.clone(),
        decision: Decision::Revoked,
        reason: "forged with the old key".into(),
        groups: Vec::new(),
        coordinator: old.public(),
        issued_ms: protocol::v1::now_ms() + 3_600_000,
    };
    let mut client = raw(coord, "rot-forger-2")?;
    match client.publish(
        &topics::enroll_answer(device),
        seal_answer(&answer, old),
        WAIT,
    )? {
        edge_tests::RawOutcome::Acked => Ok(()),
        other => bail!("forged revocation not published: {other:?}"),
    }
}
