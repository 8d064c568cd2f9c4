//! Fleet-scale scenarios with the simulator (`edge-sim`): hundreds of simulated devices, each
//! with its own MQTT connection and the agent library's own enrollment, outbox, uplink and
//! deploy state machine, against the real coordinator (embedded broker). Only the pipelines are
//! simulated: a candidate passes or fails its health check by the scenario's rule.
//!
//! - 500 devices on v1 take v2 as a canary rollout (canary 5%, then batches): it completes
//!   and every device ends on v2.
//! - 200 devices on v1; v2 goes out canary-first and every tenth device fails its health
//!   check: the rollout halts in the canary wave, the canary devices that took v2 get the
//!   rollback, and at the end no device runs v2.
//!
//! - 200 devices in a federated task, 15% of them dropping out (never answering) and 15%
//!   straggling: every round closes by quorum, on the prompt devices' updates.
//!
//! - 100 devices rebooting and losing power about three times a second across the fleet take
//!   a deployment: every device comes back enrolled; those that report healthy run the new
//!   version, and any that does not was restarted (one restarted during its health check
//!   refuses that version from then on, by design).
//! - 50 devices beside rogue clients (`edge-attacker`: impersonation, a flood, a forged deploy
//!   status, sybil enrollments) take a deployment; no rogue id registers.
//! - 30 devices, some behind shaped links (delay, a bandwidth cap and outages; forced
//!   disconnects), beside a rogue client replaying one device's sealed message: the shaped
//!   devices go offline and come back, the replay is dropped and counted by the coordinator,
//!   and every device takes a deployment.
//!
//! Sized for CI on two cores; nothing here asserts a timing.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_sim::Report;
use edge_testmodels::onnx_builder;
use edge_tests::digits::Split;
use edge_tests::sim::Sim;
use edge_tests::{
    Coordinator, Event, FL_GROUP, FL_MODEL, FlTask, PipelineDir, SigningKey, TestEnv,
    closed_rounds, deploy, federated_data, run_test, task_finished,
};

/// Enrolling and registering a few hundred devices on a loaded 2-core machine.
const ENROLL_WAIT: Duration = Duration::from_secs(150);
const STOP_WAIT: Duration = Duration::from_secs(60);

fn features(name: &str) -> String {
    format!(
        r#"
name = "{name}"
[[source]]
name = "imu"
kind = "synthetic"
stream = "imu"
rate_hz = 40
window = 64
[[stage]]
name = "features"
module = "modules/features.wasm"
input = "imu"
config = {{ sample_rate_hz = 1000.0, bands = 4 }}
[[sink]]
kind = "outbox"
input = "features"
stream = "features"
"#
    )
}

/// A pipeline version in `env`'s folder `dir`: the features pipeline named `pipeline`.
fn version(env: &TestEnv, dir: &str, pipeline: &str) -> Result<PipelineDir> {
    PipelineDir::create(
        &env.path(dir),
        &features(pipeline),
        &[("feature_extractor", "modules/features.wasm")],
    )
}

/// The scenario: `devices` in `group` (its claim key in `claim-GROUP.key`), trusting `key`,
/// pinning the coordinator's identity (`pin`) as a provisioned fleet would; `extra` holds the
/// scenario's `[health]` or `[fl]` section; its lines before the first table header are keys of
/// `[fleet]` (e.g. `outbox = "disk"`).
fn scenario(
    group: &str,
    devices: u32,
    key: &SigningKey,
    pin: &protocol::v1::auth::PublicIdentity,
    extra: &str,
) -> String {
    let split = extra
        .lines()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(extra.lines().count());
    let mut fleet_keys = extra.lines().take(split).collect::<Vec<_>>().join("\n");
    if !fleet_keys.contains("telemetry_interval_s") {
        fleet_keys.push_str("\ntelemetry_interval_s = 20");
    }
    let extra = extra.lines().skip(split).collect::<Vec<_>>().join("\n");
    format!(
        r#"
[fleet]
start_per_second = 100
{fleet_keys}

[[fleet.group]]
name = "{group}"
devices = {devices}
claim_key_file = "claim-{group}.key"

[agent.mqtt]
url = "mqtt://127.0.0.1:1"
reconnect_min_ms = 200
reconnect_max_ms = 2000

[agent.enrollment]
retry_ms = 2000
coordinator = {{ sign = "{sign}", agree = "{agree}" }}

[agent.deploy]
trusted_keys = ["{key}"]
resend_after_ms = 3000

{extra}
"#,
        key = key.public_hex,
        sign = pin.sign,
        agree = pin.agree,
    )
}

fn ids(devices: u32) -> Vec<String> {
    group_ids("lab", devices)
}

fn group_ids(group: &str, devices: u32) -> Vec<String> {
    (0..devices).map(|i| format!("{group}-{i:05}")).collect()
}

/// `fail_fraction` of the devices fail the health check of pipeline `hungry`, 3 s after it
/// starts (processing nothing until then): the healthy canary devices (3 frames, about a
/// second) commit v2 first, so the halt has updated devices to roll back.
fn health(fail_fraction: f64) -> String {
    format!(
        "[health]\nfail_fraction = {fail_fraction}\npipelines = [\"hungry\"]\nfail_after_s = 3.0\n"
    )
}

/// Starts the simulator (its files in `env`'s `sim/`) and waits until every device registered
/// with the coordinator.
fn start_fleet(
    env: &TestEnv,
    coord: &Coordinator,
    key: &SigningKey,
    group: &str,
    devices: u32,
    extra: &str,
) -> Result<Sim> {
    let dir = env.path("sim");
    std::fs::create_dir_all(&dir)?;
    edge_tests::enroll::write_claim_key(&dir.join(format!("claim-{group}.key")), &[group])?;
    let pin = edge_tests::enroll::coordinator_identity(&coord.state_dir())?;
    let mut sim = Sim::start(
        &dir,
        &scenario(group, devices, key, &pin, extra),
        &coord.url(),
    )?;
    let want: BTreeSet<String> = group_ids(group, devices).into_iter().collect();
    let mut journal = coord.journal();
    let waited = journal.wait_for("every simulated device registered", ENROLL_WAIT, |events| {
        let seen: BTreeSet<&str> = events
            .iter()
            .filter(|e| e.is("registered"))
            .filter_map(|e| e.str_field("device"))
            .collect();
        want.iter().all(|d| seen.contains(d.as_str()))
    });
    if let Err(e) = waited {
        let running = sim.is_running();
        return Err(e.context(format!(
            "simulator running: {running}; its log:\n{}",
            sim.log_tail(30)
        )));
    }
    Ok(sim)
}

fn report(sim: &mut Sim) -> Result<Report> {
    let path = sim.stop(STOP_WAIT)?;
    let text = std::fs::read_to_string(&path)?;
    serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))
}

const HEALTH: [&str; 6] = [
    "--health-messages",
    "3",
    "--health-seconds",
    "0",
    "--timeout-s",
    "300",
];

fn decisions<'a>(events: &'a [Event], deployment: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.is("rollout_decision") && e.str_field("deployment_id") == Some(deployment))
        .collect()
}

#[test]
fn canary_rollout_to_500_simulated_devices_completes() {
    run_test("fleet_sim_canary_500", |env| {
        const N: u32 = 500;
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
        let mut sim = start_fleet(env, &coord, &key, "lab", N, "")?;

        // v1 to the whole group at once: the version a canary rolls back to.
        let v1 = version(env, "v1", "vibration")?;
        let run = deploy(&coord, &["--group", "lab"], &v1, &key, 1, &HEALTH)?;
        ensure!(
            run.success,
            "v1 rollout failed:\n{}\n{}",
            run.stdout,
            run.stderr
        );

        // v2 canary-first: 5%, then batches of 30%, each gated on health.
        let v2 = version(env, "v2", "vibration2")?;
        let args = [
            "--strategy",
            "canary",
            "--canary",
            "5%",
            "--batch",
            "30%",
            "--soak-secs",
            "1",
            "--max-failures",
            "1%",
            "--id",
            "fleet-v2",
        ];
        let mut all: Vec<&str> = args.to_vec();
        all.extend(HEALTH);
        let run = deploy(&coord, &["--group", "lab"], &v2, &key, 2, &all)?;
        ensure!(
            run.success,
            "the canary rollout failed:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let healthy = ids(N)
            .iter()
            .filter(|d| run.outcome(d).is_some_and(|o| o.starts_with("healthy")))
            .count();
        ensure!(
            healthy == N as usize,
            "{healthy} of {N} devices reported healthy:\n{}",
            run.stdout
        );
        let mut journal = coord.journal();
        journal.refresh()?;
        let d = decisions(journal.events(), "fleet-v2");
        let launched = d
            .iter()
            .filter(|e| e.str_field("decision") == Some("launched"))
            .count();
        ensure!(
            launched >= 3 && !d.iter().any(|e| e.str_field("decision") == Some("halted")),
            "expected a canary and batches, no halt: {:?}",
            d.iter()
                .map(|e| e.str_field("decision"))
                .collect::<Vec<_>>()
        );

        let r = report(&mut sim)?;
        ensure!(
            r.devices.len() == N as usize,
            "{} devices reported",
            r.devices.len()
        );
        for dev in &r.devices {
            ensure!(
                dev.enrolled
                    && dev.pipeline == "vibration2"
                    && dev.version == 2
                    && dev.deployment_id == "fleet-v2"
                    && dev.committed == 2,
                "{} ends on {:?} v{} ({})",
                dev.device,
                dev.pipeline,
                dev.version,
                dev.deployment_id
            );
        }
        ensure!(r.summary.versions.get("v2") == Some(&(N as usize)));
        Ok(())
    });
}

#[test]
fn failing_health_halts_the_canary_wave_and_rolls_the_updated_back() {
    run_test("fleet_sim_canary_halt", |env| {
        const N: u32 = 200;
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
        // Every tenth device (lab-00009, lab-00019, ...) fails `hungry`'s health check.
        let mut sim = start_fleet(env, &coord, &key, "lab", N, &health(0.1))?;

        let v1 = version(env, "v1", "vibration")?;
        let run = deploy(&coord, &["--group", "lab"], &v1, &key, 1, &HEALTH)?;
        ensure!(
            run.success,
            "v1 rollout failed:\n{}\n{}",
            run.stdout,
            run.stderr
        );

        // v2: the canary (10%: lab-00000..lab-00019, in id order) holds two failing devices.
        let v2 = version(env, "v2", "hungry")?;
        let rollback_to = v1.toml.to_string_lossy().into_owned();
        let mut args = vec![
            "--strategy",
            "canary",
            "--canary",
            "10%",
            "--batch",
            "30%",
            "--soak-secs",
            "1",
            "--max-failures",
            "0",
            "--id",
            "hungry",
            "--rollback-to",
            rollback_to.as_str(),
        ];
        args.extend(HEALTH);
        let run = deploy(&coord, &["--group", "lab"], &v2, &key, 2, &args)?;
        ensure!(!run.success, "a halted rollout must fail:\n{}", run.stdout);
        ensure!(
            run.stderr.contains("halted"),
            "the error names the halt:\n{}",
            run.stderr
        );

        let mut journal = coord.journal();
        journal.refresh()?;
        let d = decisions(journal.events(), "hungry");
        let summary: Vec<Option<&str>> = d.iter().map(|e| e.str_field("decision")).collect();
        ensure!(
            summary.first() == Some(&Some("launched"))
                && summary.last() == Some(&Some("halted"))
                && summary.iter().filter(|s| **s == Some("launched")).count() == 1,
            "the rollout must halt in its canary wave: {summary:?}"
        );
        let canary: BTreeSet<String> = ids(N).into_iter().take(20).collect();
        let launched: BTreeSet<String> = d[0]
            .raw
            .get("devices")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        ensure!(launched == canary, "the canary wave: {launched:?}");

        // Wait until the rollback reached every canary device that took v2, as the coordinator
        // sees it through their telemetry... the simulator's own record is the end state, so
        // stop it once the coordinator has no device left on v2.
        journal.wait_for(
            "no device reports v2 any more",
            Duration::from_secs(120),
            |j| {
                canary.iter().all(|dev| {
                    j.iter()
                        .rev()
                        .find(|e| e.is_for("telemetry", dev))
                        .and_then(|e| e.raw.get("pipeline"))
                        .and_then(|p| p.get("name"))
                        .and_then(|n| n.as_str())
                        == Some("vibration")
                })
            },
        )?;

        let r = report(&mut sim)?;
        ensure!(r.devices.len() == N as usize);
        for dev in &r.devices {
            ensure!(
                dev.pipeline == "vibration",
                "{} ends on {:?} v{}: every device must be back on (or never left) v1's pipeline",
                dev.device,
                dev.pipeline,
                dev.version
            );
            if !canary.contains(&dev.device) {
                ensure!(
                    dev.version == 1 && dev.candidates == 1,
                    "{} is outside the canary and must never see v2 (v{}, {} candidates)",
                    dev.device,
                    dev.version,
                    dev.candidates
                );
            } else if dev.fails_health {
                // It rolled itself back; the halt may also have sent it the rollback (v1's
                // pipeline as version 3) if its failure report was still on its way.
                ensure!(
                    dev.health_failed == 1 && dev.discarded == 1 && [1, 3].contains(&dev.version),
                    "{} failed v2's health check and stays on v1's pipeline: {dev:?}",
                    dev.device
                );
            }
        }
        // Every canary device that committed v2 before the halt got the rollback.
        let took_v2: BTreeSet<&str> = r
            .timeline
            .iter()
            .filter(|e| e.event == "live" && e.detail.starts_with("hungry v2"))
            .map(|e| e.device.as_str())
            .collect();
        ensure!(
            !took_v2.is_empty(),
            "no canary device took v2 before the halt"
        );
        for d in &took_v2 {
            let end = r.devices.iter().find(|e| e.device == *d);
            ensure!(
                end.is_some_and(|e| e.version == 3 && e.deployment_id == "hungry-rollback"),
                "{d} took v2 and must end on the rollback: {end:?}"
            );
        }
        ensure!(took_v2.iter().all(|d| canary.contains(*d)));
        Ok(())
    });
}

#[test]
fn federated_rounds_with_200_simulated_clients_close_by_quorum() {
    run_test("fleet_sim_fl_200", |env| {
        const N: u32 = 200;
        const ROUNDS: u32 = 3;
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
        let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1));
        let task_dir = env.path("task");
        federated_data(&task_dir, 1, Split::Iid, &model)?;
        std::fs::create_dir_all(env.path("sim"))?;
        std::fs::write(env.path("sim").join("model.onnx"), &model)?;
        // Devices 0-14 of every hundred never answer, 15-29 answer 3 s late. Telemetry every
        // 2 s: it tells when every member has the final weights.
        let fl = format!(
            "telemetry_interval_s = 2\n[fl]\nmodel = \"{FL_MODEL}\"\nmodel_file = \"model.onnx\"\n\
             dropout_fraction = 0.15\nstraggler_fraction = 0.15\nstraggler_delay_s = 3\n"
        );
        let mut sim = start_fleet(env, &coord, &key, FL_GROUP, N, &fl)?;

        let mut task = FlTask::new("simfl", ROUNDS, N as usize / 2);
        // Half the members train each round: the other 100 get the weights once, on the
        // group's round topic. 60% of the selected close a round: the prompt 70% suffice,
        // dropouts never answer.
        task.fraction = 0.5;
        task.quorum = 0.6;
        task.round_interval_s = 1;
        task.start(&coord, &task_dir, &key)?;
        let mut journal = coord.journal();
        journal.wait_for(
            "the federated task finished",
            Duration::from_secs(180),
            |e| task_finished(e, "simfl"),
        )?;
        let closed = closed_rounds(journal.events(), "simfl");
        ensure!(
            closed.len() == ROUNDS as usize,
            "{} rounds closed",
            closed.len()
        );
        for e in &closed {
            let received = e.f64_field("received").unwrap_or(0.0);
            ensure!(
                e.str_field("close_reason") == Some("quorum"),
                "a round closed by {:?}, not quorum: {:?}",
                e.str_field("close_reason"),
                e.raw
            );
            // Quorum is 60 of 100 selected; their dropouts never answer.
            ensure!(
                (60.0..=85.0).contains(&received),
                "round received {received} updates: {:?}",
                e.raw
            );
        }

        // Every member that answers (a dropout stays in the round it never finishes), selected
        // or not, reports the final weights: the group's message reached them all.
        let answering: Vec<String> = group_ids(FL_GROUP, N)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 100 >= 15)
            .map(|(_, d)| d)
            .collect();
        journal.wait_for(
            "every answering member's telemetry with the final version",
            Duration::from_secs(60),
            |events| {
                let done: BTreeSet<&str> = events
                    .iter()
                    .filter(|e| e.is("telemetry"))
                    .filter(|e| e.raw["fl"]["version"].as_u64() == Some(u64::from(ROUNDS)))
                    .filter_map(|e| e.str_field("device"))
                    .collect();
                answering.iter().all(|d| done.contains(d.as_str()))
            },
        )?;

        let r = report(&mut sim)?;
        for dev in &r.devices {
            match dev.fl_role.as_str() {
                "dropout" => ensure!(dev.fl_trained == 0, "{dev:?}"),
                "prompt" | "straggler" => {
                    ensure!(dev.fl_trained <= ROUNDS, "{dev:?}")
                }
                other => anyhow::bail!("{}: unexpected role {other:?}", dev.device),
            }
            // Selected or not, every member that answers has the final weights (the group's
            // message; a dropout stays in the round it never finishes), and no round message
            // was refused (a member takes the group's message and its own train order of the
            // same round without calling either a replay).
            ensure!(
                (dev.fl_role == "dropout" || dev.fl_version == ROUNDS) && dev.fl_rejected == 0,
                "{}: version {}, {} refused",
                dev.device,
                dev.fl_version,
                dev.fl_rejected
            );
        }
        let prompt_trained: u32 = r
            .devices
            .iter()
            .filter(|d| d.fl_role == "prompt")
            .map(|d| d.fl_trained)
            .sum();
        ensure!(
            prompt_trained >= 60 * ROUNDS,
            "prompt devices trained {prompt_trained} rounds in all"
        );
        ensure!(
            r.devices.iter().filter(|d| d.fl_role == "dropout").count() == 30,
            "30 dropouts expected"
        );
        Ok(())
    });
}

#[test]
fn churned_fleet_comes_back_and_only_restarted_devices_miss_the_deployment() {
    run_test("fleet_sim_churn", |env| {
        const N: u32 = 100;
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
        // About three restarts a second across the fleet, a third of them power cuts.
        let churn =
            "[churn]\nreboots_per_minute = 120\npower_cuts_per_minute = 60\ndown_s = 1\nseed = 7\n";
        let mut sim = start_fleet(env, &coord, &key, "lab", N, churn)?;
        let mut journal = coord.journal();
        // A restarted device registers again: wait until the churn has restarted some.
        journal.wait_for(
            "devices registering again after restarts",
            ENROLL_WAIT,
            |e| e.iter().filter(|e| e.is("registered")).count() >= N as usize + 10,
        )?;

        let v1 = version(env, "v1", "vibration")?;
        // A device restarted in the middle of its health check counts that version as failed
        // (the candidate may be what brought it down) and refuses it from then on, so under
        // churn some devices may end without v1; each of them must have been restarted.
        let run = deploy(&coord, &["--group", "lab"], &v1, &key, 1, &HEALTH)?;

        let r = report(&mut sim)?;
        ensure!(
            r.summary.reboots > 0 && r.summary.power_cuts > 0,
            "no churn happened: {:?}",
            r.summary
        );
        ensure!(
            !r.timeline.iter().any(|e| e.event == "start-failed"),
            "a device did not start again: {:?}",
            r.timeline
                .iter()
                .filter(|e| e.event == "start-failed")
                .collect::<Vec<_>>()
        );
        let mut healthy = 0;
        for dev in &r.devices {
            ensure!(dev.enrolled, "{} is not enrolled after churn", dev.device);
            let outcome = run.outcome(&dev.device).unwrap_or("");
            if outcome.starts_with("healthy") {
                healthy += 1;
                ensure!(
                    dev.pipeline == "vibration" && dev.version == 1,
                    "{} reported healthy but ends on {:?} v{}",
                    dev.device,
                    dev.pipeline,
                    dev.version
                );
            } else {
                ensure!(
                    dev.reboots + dev.power_cuts > 0,
                    "{} never restarted, yet its outcome is {outcome:?}:\n{}",
                    dev.device,
                    run.stdout
                );
            }
        }
        ensure!(healthy > 0, "no device took v1:\n{}", run.stdout);
        Ok(())
    });
}

#[test]
fn rogue_clients_change_nothing_for_the_fleet() {
    run_test("fleet_sim_rogue", |env| {
        const N: u32 = 50;
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
        // The security tests' attacker, holding none of the fleet's keys. These devices keep
        // their outboxes in the agent's own sled store and write-ahead log (on tmpfs), the
        // other scenarios in memory.
        let rogues = r#"outbox = "disk"
[[rogue]]
attack = ["impersonate", "lab-00001"]
[[rogue]]
attack = ["flood", "lab-00002", "300"]
[[rogue]]
attack = ["forge-status", "lab-00003", "forged", "1"]
[[rogue]]
attack = ["sybil", "20"]
"#;
        let pin = edge_tests::enroll::coordinator_identity(&coord.state_dir())?;
        let text = scenario("lab", N, &key, &pin, rogues);
        let parsed = edge_sim::Scenario::parse(&text, std::path::Path::new("scenario.toml"))?;
        ensure!(parsed.fleet.outbox == edge_sim::scenario::OutboxStore::Disk);
        let mut sim = start_fleet(env, &coord, &key, "lab", N, rogues)?;
        let mut journal = coord.journal();
        journal.wait_for("the impersonation refused", ENROLL_WAIT, |e| {
            e.iter().any(|e| e.is("auth_rejected"))
        })?;

        let v1 = version(env, "v1", "vibration")?;
        let run = deploy(&coord, &["--group", "lab"], &v1, &key, 1, &HEALTH)?;
        ensure!(
            run.success,
            "the rollout beside rogue clients failed:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let r = report(&mut sim)?;
        let ran: Vec<&str> = r
            .timeline
            .iter()
            .filter(|e| e.event.starts_with("rogue"))
            .map(|e| e.detail.as_str())
            .collect();
        ensure!(
            r.timeline.iter().filter(|e| e.event == "rogue").count() == 4,
            "every rogue attack ran: {ran:?}"
        );
        for dev in &r.devices {
            ensure!(
                dev.enrolled && dev.pipeline == "vibration" && dev.version == 1,
                "{} beside rogue clients: {dev:?}",
                dev.device
            );
        }
        // No sybil id became a device: only the fleet's devices registered.
        journal.refresh()?;
        let fleet: BTreeSet<String> = ids(N).into_iter().collect();
        let strangers: BTreeSet<&str> = journal
            .events()
            .iter()
            .filter(|e| e.is("registered"))
            .filter_map(|e| e.device.as_deref())
            .filter(|d| !fleet.contains(*d))
            .collect();
        ensure!(strangers.is_empty(), "registered strangers: {strangers:?}");
        Ok(())
    });
}

#[test]
fn shaped_links_and_a_replayed_message() {
    run_test("fleet_sim_links", |env| {
        const N: u32 = 30;
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
        // Profile 1 (lab-00000 and indices 3, 6, 9, ...): 100 ms each way, 1 Mbit/s, down 2 s
        // of every 8. Profile 2 (indices 4, 14, 24; 9, 19, 29 match profile 1 first): forced
        // disconnects about once a second. lab-00002 is unshaped; a rogue replays its message.
        let extra = r#"
[[link]]
devices = ["lab-00000"]
fraction = 0.3
delay_ms = 100
bandwidth_kbps = 1000
outage_every_s = 8
outage_s = 2

[[link]]
fraction = 0.2
disconnects_per_minute = 60

[[rogue]]
attack = ["replay", "lab-00002"]
"#;
        let outaged = ["lab-00000", "lab-00003", "lab-00006"];
        let disconnected = ["lab-00004", "lab-00014", "lab-00024"];
        let mut sim = start_fleet(env, &coord, &key, "lab", N, extra)?;
        let mut journal = coord.journal();
        // The broker publishes a device's last will when its link drops it; the coordinator
        // journals it as offline. Wait for both kinds of shaped device to have dropped once,
        // and for the replay to have been dropped.
        journal.wait_for(
            "shaped devices offline and the replay dropped",
            ENROLL_WAIT,
            |events| {
                let offline: BTreeSet<&str> = events
                    .iter()
                    .filter(|e| e.is("offline"))
                    .filter_map(|e| e.str_field("device"))
                    .collect();
                outaged.iter().any(|d| offline.contains(d))
                    && disconnected.iter().any(|d| offline.contains(d))
                    && replays(events) >= 1
            },
        )?;
        let v1 = version(env, "v1", "vibration")?;
        let run = deploy(&coord, &["--group", "lab"], &v1, &key, 1, &HEALTH)?;
        ensure!(
            run.success,
            "the rollout over shaped links failed:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let r = report(&mut sim)?;
        for dev in &r.devices {
            ensure!(
                dev.enrolled && dev.pipeline == "vibration" && dev.version == 1,
                "{} over its link: {dev:?}",
                dev.device
            );
        }
        let linked = |event: &str| -> BTreeSet<&str> {
            r.timeline
                .iter()
                .filter(|e| e.event == event)
                .map(|e| e.device.as_str())
                .collect()
        };
        let outages = linked("link-outage");
        let disconnects = linked("link-disconnect");
        ensure!(
            outaged.iter().any(|d| outages.contains(d)),
            "no outage on profile 1's devices: {outages:?}"
        );
        ensure!(
            disconnects.iter().all(|d| disconnected.contains(d)),
            "forced disconnects outside profile 2: {disconnects:?}"
        );
        ensure!(
            !outages.contains("lab-00002") && !outages.iter().any(|d| disconnected.contains(d)),
            "outages outside profile 1: {outages:?}"
        );
        let replayed: Vec<&str> = r
            .timeline
            .iter()
            .filter(|e| e.event == "rogue")
            .map(|e| e.detail.as_str())
            .collect();
        ensure!(
            replayed.len() == 1 && replayed[0].contains("replayed a recorded message"),
            "the replay did not run: {replayed:?}"
        );
        Ok(())
    });
}

/// Messages the coordinator dropped as replays, from its `auth_rejected` events.
fn replays(events: &[Event]) -> u64 {
    events
        .iter()
        .filter(|e| e.is("auth_rejected"))
        .filter_map(|e| e.raw.get("reasons")?.get("replay")?.as_u64())
        .sum()
}
